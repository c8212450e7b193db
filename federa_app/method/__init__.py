"""The method: what is trained and how it starts.

FeDeRA's initialisation (truncated SVD of the pre-trained weights into LoRA factors), the other
fine-tuning methods (LoRA, FFA-LoRA, BitFit, bottleneck adapters, full fine-tuning) built with
peft on a Hugging Face model, local training and server-side evaluation, and the export of the
final model that plain transformers + peft can load. Changes when a method or its maths changes.
"""
