"""Hand-written adapters: plain LoRA (`models.lora_simple`) and DS-LoRA (`models.ds_lora`)."""
