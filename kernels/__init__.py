"""fastlora's Triton kernels and their launchers (imported as ``fastlora.kernels``).

This floor imports torch and triton only. Nothing runs at import time.
"""
