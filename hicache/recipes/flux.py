"""FLUX (`FluxTransformer2DModel`), as in the paper and the official HiCache code.

Double-stream blocks: the pre-gate attention outputs (``attn`` returns the image and text outputs
as a tuple) and the pre-gate image and text MLP outputs are forecast. Single-stream blocks: the
pre-gate ``proj_out`` output is forecast, and the attention and MLP input projection that only feed
it are skipped, as are the LayerNorms in front of forecast modules and the rotary embedding
(``pos_embed``) that only attention reads, and the adaLN modulation linears compute only their gate
rows. A cached step then runs only the embeddings, the gates and the residual adds.
"""

from . import double_single_stream, register_recipe

FLUX = register_recipe(double_single_stream("flux"))
