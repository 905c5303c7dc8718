"""The compiled parts, both optional: diff's fused kernel and the merges' fused weighted sum (everything
else is configured in pyproject.toml). Where one does not compile, the install goes on: diff computes the
same numbers in numpy, the merges in torch. The weighted sum must round exactly as the torch path does,
so no multiply-add may be fused."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("surgery.comparison._measure", ["surgery/comparison/_measure.c"], optional=True),
    Extension("surgery.compute._combine", ["surgery/compute/_combine.c"], optional=True,
              extra_compile_args=["-ffp-contract=off"]),
])
