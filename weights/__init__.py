"""Pretrained weights shipped with nic (installed as the package ``nic.pretrained``).

``default.npz`` holds the shared transforms, the per-quality gains and the integer
CDF tables of every quality. Produced by ``nic train`` + ``nic export``; see
README.md for how they were trained.
"""
