"""MixT5: upcycle a pretrained dense T5 (or BERT-family encoder) into a sparse Mixture-of-Experts and fine-tune it.

```python
from mixt5 import MoEConfig, upcycle
model = upcycle(dense_t5, MoEConfig(num_experts=8, top_k=2, moe_layers="last:6"))
```
Importing `mixt5` registers `model_type="mixt5"` (and "mixbert", "mixroberta", "mixxlm-roberta", "mixelectra") with
transformers' Auto classes.
"""

from .config import MixBertConfig, MixT5Config, MoEConfig
from .modeling import (
    MixBertForQuestionAnswering,
    MixBertForSequenceClassification,
    MixBertModel,
    MixT5EncoderModel,
    MixT5ForConditionalGeneration,
    MixT5PreTrainedModel,
    MoEModelMixin,
    router_logits_to_expert_load,
)
from .upcycle import upcycle

__version__ = "0.1.0"

__all__ = [
    "MixBertConfig",
    "MixBertForQuestionAnswering",
    "MixBertForSequenceClassification",
    "MixBertModel",
    "MixT5Config",
    "MixT5EncoderModel",
    "MixT5ForConditionalGeneration",
    "MixT5PreTrainedModel",
    "MoEConfig",
    "MoEModelMixin",
    "router_logits_to_expert_load",
    "upcycle",
]
