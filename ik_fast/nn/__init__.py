"""The torch.nn layer, its functional form and the conversion of research checkpoints."""
