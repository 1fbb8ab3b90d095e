"""``fastdiff train``: trains a DDPM U-Net or a VAE end to end on fastdiff's fused ops."""
