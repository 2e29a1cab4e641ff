"""File format and tensor I/O: the safetensors container read without torch (headers, content identity,
atomic writes, timestamps), versions and lineage of merged models (`lineage`), tensor saving with torch, and
`inspect`'s numpy-only reader.

Bottom layer: imports only `taskvec.errors` and `taskvec.progress`. `files` and `inspection` never import
torch, so commands that need no model start fast.
"""
