"""elsa-codec: one dense weight file that serves several nested sparse networks.

Implements ELSA (Halvachi, Peste, Alistarh, Lampert, arXiv 2312.06872): the level each weight
belongs to is stored in the low mantissa bits of the weight itself. Importing this package never
needs Triton nor initialises CUDA.
"""
from .errors import ELSAError, ELSAFormatError
from .bits import (
    MAX_CODE_BITS,
    decode_codes,
    decode_counters,
    default_code_bits,
    encode_tensor,
    extract_level,
    level_mask,
    sqnr_db,
    ulp_error,
)

__version__ = "0.1.0"
from .masks import magnitude_mask, parse_structure
from .codec import (
    BN_PREFIX,
    Counters,
    ELSAMeta,
    ELSAStateDict,
    counters_from_masks,
    encode,
    extract,
    magnitude_counters,
)
from .stream import encode_file
from .io import load_counters, load_file, read_meta, save_counters, save_file
from .sparsify import GMPSchedule, MagnitudeSparsifier, Sparsifier, erk_densities, gmp_sparsity
from .sparsifiers import (
    EarlyBirdSparsifier,
    L0Sparsifier,
    LotteryTicketSparsifier,
    PruningPipeline,
    RandomSparsifier,
    VariationalDropoutSparsifier,
    label_smoothing,
    sparsity_penalty,
    zero_init_,
)
from .train import ELSAResult, Phase, embed_levels, prune_gmp, recalibrate_bn
from .config import ELSAConfig
from .embedder import LevelEmbedder
from .nn import ELSAConv1d, ELSAConv2d, ELSALinear, LevelBatchNorm1d, LevelBatchNorm2d, LevelBatchNorm3d
from .embedding import ELSAEmbedding
from .select import SELECT_POLICIES, select_weights
from .swap import elsa_modules, elsa_state_dict, levels, load, set_level, set_sparsity, swap_


def __getattr__(name):
    # ELSAConv1D subclasses transformers' Conv1D: import transformers only when it is asked for.
    if name == "ELSAConv1D":
        from .hf import ELSAConv1D

        return ELSAConv1D
    raise AttributeError(f"module 'elsa_codec' has no attribute {name!r}")
