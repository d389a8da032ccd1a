"""Distributed-GAN methods, one module (or package) each, all running on the same engine.

Each method fills the hooks of `entgan.engine.method` (a server role and a worker role); the
registry that names them is `entgan.engine.registry`.
"""
