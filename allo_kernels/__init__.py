"""Raw Triton kernels. Users go through the wrappers in ``allo`` (allo.optim, allo.select); each
kernel here has a plain-PyTorch reference next to its wrapper, which the tests compare against."""
