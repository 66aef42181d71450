"""Text search over the catalog: tokens, a BM25 index with prefix and typo expansion, filters.

Pure numpy / scipy cores that the server imports (no pandas, no torch); the offline pipeline
builds the index (:func:`slimrank.search.text_index.build_text_index`) into the bundle.
"""
