"""Your own decoder trained as an embedder with the soft mask (Conan-Embedding-v2 §3.2, eq. 4): attention moves from
causal (alpha = 0) to bidirectional (alpha = 1) along the App. C schedule while a SentenceTransformerTrainer trains."""
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import Qwen2Config, Qwen2Model

from conan_hf import InfoNCELoss, SoftMaskCallback, apply_soft_mask, build_sentence_transformer, get_soft_mask_alpha
from conan_hf.demo import demo_pairs

# Any transformers decoder (Qwen2, Llama, Mistral, ...); a tiny random Qwen2 here, with conan-hf's demo tokenizer.
decoder = Qwen2Model(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=4096))
model = build_sentence_transformer(decoder, pooling="mean", attention_mode=None, max_seq_length=64, device="cpu")
apply_soft_mask(model)  # patches the decoder inside the SentenceTransformer; alpha starts at 0 (causal)

pairs = demo_pairs()[:64]
dataset = Dataset.from_dict({"anchor": [p["query"] for p in pairs], "positive": [p["positive"] for p in pairs]})
args = SentenceTransformerTrainingArguments(
    output_dir="own_decoder_soft_mask", max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3,
    logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
)
trainer = SentenceTransformerTrainer(
    model=model, args=args, train_dataset=dataset, loss=InfoNCELoss(model, temperature=0.05),
    callbacks=[SoftMaskCallback(schedule="linear")],  # alpha(t) = t / max_steps, logged as soft_mask_alpha
)
trainer.train()
print(f"soft-mask alpha after training: {get_soft_mask_alpha(model):.2f}")  # 1.00: bidirectional
