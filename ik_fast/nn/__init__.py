"""The torch.nn layer and its functional form, graph preparation, pickling and conversion of checkpoints."""
