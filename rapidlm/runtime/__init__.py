"""Running the model: device and dtype choice, the static KV cache, one forward per step."""
