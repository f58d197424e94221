import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def nsn_checkpoint(tmp_path_factory):
    """``nsn_checkpoint(arch)`` -> path of a tiny NSN checkpoint (half-rank factors, tokenizer)."""
    import nsn_export as nsn
    from tiny import tiny_model, tiny_tokenizer

    cache = {}

    def build(arch: str):
        if arch not in cache:
            model = tiny_model(arch)
            nsn.adapt(model, "all-linear", max_rank=16)
            model.nsn_config.trained_ranks = [4, 8, 16]
            cache[arch] = nsn.save_nsn(model, tmp_path_factory.mktemp("ckpt") / arch, tokenizer=tiny_tokenizer())
        return cache[arch]

    return build


@pytest.fixture(scope="session")
def exported(tmp_path_factory, nsn_checkpoint):
    """``exported(arch, mode)`` -> (export directory, the torch NSN model it came from), verified."""
    import nsn_export as nsn
    from nsn_export.export import export_onnx

    cache = {}

    def build(arch: str, mode: str = "slice"):
        if (arch, mode) not in cache:
            checkpoint = nsn_checkpoint(arch)
            model = nsn.load_nsn(checkpoint)
            result = export_onnx(model, tmp_path_factory.mktemp("onnx") / f"{arch}-{mode}", rank_mode=mode,
                                 tokenizer_dir=checkpoint)
            cache[arch, mode] = (result, model)
        return cache[arch, mode]

    return build
