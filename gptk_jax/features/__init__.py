"""The frozen trunk's features, computed once and memory-mapped for head training: cache (the
cache folder: build with the shared prompt prefix run once, fingerprint, reads), shares (one
share per process, built side by side and read as one), trunk_argmax (the trunk's chunked
argmax, the training targets).
"""
