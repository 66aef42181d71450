"""Two-tower embeddings and the FAISS product-quantization index."""
