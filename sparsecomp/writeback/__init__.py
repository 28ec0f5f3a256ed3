"""Back to the user's eager module: write a compressed graph's result onto it, save it, load it again."""

from .apply import write_back
from .modules import MODULE_RULES, LowRankConv, LowRankLinear, module_rule
from .saving import load_compressed, save_compressed

__all__ = ["MODULE_RULES", "LowRankConv", "LowRankLinear", "load_compressed", "module_rule",
           "save_compressed", "write_back"]
