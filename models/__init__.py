"""Pure model code for Presence: numpy / onnxruntime / torch, no Ray."""
