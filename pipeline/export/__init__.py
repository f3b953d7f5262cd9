"""From a trained model to shipped .tflite files: recipes, TFLite conversion, parity, MediaPipe metadata."""
