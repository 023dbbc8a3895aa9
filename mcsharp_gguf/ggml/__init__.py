"""ggml quantisation types.

types: the table of the types MC# writes and their sizes; grids: fitting a block's scales/mins and coding on them;
packing: codes + grids → ggml's exact bytes, round-to-nearest; libggml: libggml's own (de)quantiser (ctypes).
"""
