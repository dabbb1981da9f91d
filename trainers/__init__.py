"""Training stages of Conan-Embedding-v2 and the callbacks they share (soft mask, Dynamic Hard Negative Mining)."""
