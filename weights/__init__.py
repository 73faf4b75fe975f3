"""Pretrained weights shipped with nic (installed as the package ``nic.pretrained``).

``default.npz`` is the factorized family: the shared transforms, the per-quality
gains, own pairs and integer CDF tables of every quality (``nic train`` + ``nic export``).
``hyperprior.npz`` is the hyperprior family, the default: qualities 3 and 5 trained end
to end (``tools/joint_hyperprior.py --extend``), extending ``hyperprior-5e131eae.npz``
(quality 6 trained end to end), which extends ``hyperprior-3148e4ae.npz``
(qualities 7 and 8 trained end to end), which extends ``hyperprior-f77d9120.npz``
(quality 4 trained end to end), which extends ``hyperprior-53082465.npz`` (per quality
h_a, the integer h_s and context networks and the integer tables,
``tools/train_hyperprior.py --export --ship``, sharing the transforms of ``default.npz``,
which its config names by hash). The earlier files stay so that their files decode.
See README.md and docs/hyperprior.md for how they were trained.
"""
