"""The one compiled part: diff's fused kernel (everything else is configured in pyproject.toml).
Optional: where it does not compile, the install goes on and diff computes the same numbers in numpy."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("surgery.comparison._measure", ["surgery/comparison/_measure.c"], optional=True)])
