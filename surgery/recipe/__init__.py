"""Tensor recipes and model views: what each tensor is and how it is made, knowing no file format."""
