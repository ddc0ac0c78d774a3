"""sphereops: fused Triton kernels for hyperspherical convolution (SphereConv)."""
__version__ = "0.1.0"
