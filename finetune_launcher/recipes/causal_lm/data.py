"""The causal-LM recipe's rows (the recipe table's `rows` part): the run's instruction, chat or text records
tokenised with the model's tokenizer and packed (finetune_launcher/data/text.py does the work)."""
from finetune_launcher.data.prepared import PreparedData
from finetune_launcher.data.text import prepare_data
from finetune_launcher.recipes.causal_lm.model import load_tokenizer


def prepare_rows(cfg) -> PreparedData:
    return prepare_data(cfg, load_tokenizer(cfg))
