"""Routing viewer: a traced generation (data), rendered as a self-contained HTML page (page) and as PNG
stills for TensorBoard and papers (stills). `gazelit generate ... --trace OUTDIR` writes both.
"""
