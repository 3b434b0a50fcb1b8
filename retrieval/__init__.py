"""Retrieval for kNN-LM: datastores (keys, values, a FAISS index) and what builds and scores
them with the engine."""
