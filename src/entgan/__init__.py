"""EntGAN: one multi-task GAN trained across edge nodes whose data stays where it is."""

__version__ = "0.1.0"
