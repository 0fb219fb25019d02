"""The embedded real benchmark: MNIST-family data, distribution shifts, the CLIP tokenizer and a reference pair."""
