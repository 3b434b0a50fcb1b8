"""Listwise reranking with the served model (one prefill per query, label scores)."""
