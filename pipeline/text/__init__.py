"""Text in: data files and their columns, splits, the tokenizer, word vectors, tf.data and TFRecords."""
