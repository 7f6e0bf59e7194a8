"""The report's generation: batched against one prompt at a time, 4-bit against the base dequantized once."""
