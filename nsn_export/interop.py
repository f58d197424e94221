"""Hugging Face interop: an exported NSN decoder as an optimum-onnx ``ORTModelForCausalLM``.

``NSNORTModelForCausalLM.from_pretrained(export_dir)`` then ``model.set_rank(r)``; ``generate()``
works as for any Optimum model, feeding ``rank`` on every call.
"""

from __future__ import annotations

import numpy as np
import torch
from optimum.onnxruntime import ORTModelForCausalLM


class NSNORTModelForCausalLM(ORTModelForCausalLM):
    """``ORTModelForCausalLM`` that feeds the graph's ``rank`` input (default: the maximum rank)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from deploy.metadata import NSNModelInfo, validate_rank

        self._validate_rank = validate_rank
        self.nsn_info = NSNModelInfo.from_props(self.session.get_modelmeta().custom_metadata_map)
        self.rank = self.nsn_info.max_rank

    def set_rank(self, rank: int) -> None:
        self.rank = self._validate_rank(rank, self.nsn_info.max_rank)

    def _with_rank(self, model_inputs: dict, use_torch: bool) -> dict:
        value = torch.tensor(self.rank, dtype=torch.int64) if use_torch else np.array(self.rank, np.int64)
        return {**model_inputs, "rank": value}

    def _prepare_onnx_inputs(self, use_torch, model_inputs):
        return super()._prepare_onnx_inputs(use_torch, self._with_rank(model_inputs, use_torch))

    def _prepare_io_binding(self, model_inputs, *args, **kwargs):
        return super()._prepare_io_binding(self._with_rank(model_inputs, True), *args, **kwargs)
