"""Training Skip-DiT models (DiT / Latte: DDPM; Wan: rectified flow) with accelerate (one CPU to many GPUs):
`python -m training.train --config ...` or `accelerate launch -m training.train --config ...`. Recipes live in
`training/configs/`."""
