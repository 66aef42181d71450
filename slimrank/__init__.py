"""slimrank: FAISS product-quantized retrieval and compressed rankers served over gRPC."""

__version__ = "0.1.0"
