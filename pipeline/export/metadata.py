"""MediaPipe Tasks metadata: make an exported .tflite a drop-in MediaPipe TextClassifier model.

The metadata is a `ModelMetadata` flatbuffer (MediaPipe's metadata_schema.fbs) stored in a model
buffer under the name "TFLITE_METADATA"; the files it names (vocab.txt, labels.txt) travel in an
uncompressed zip appended to the model, whose offsets count from the start of the file.
"""
import io
import zipfile
from pathlib import Path

import flatbuffers
import numpy as np

from pipeline.core.errors import PipelineError

METADATA_NAME = "TFLITE_METADATA"
VOCAB_FILE, LABELS_FILE = "vocab.txt", "labels.txt"
# BertTokenizerOptions and subgraph input_process_units (what we use) need metadata parser 1.1.0.
MIN_PARSER_VERSION = "1.1.0"
# MediaPipe's BertPreprocessorCalculator finds the three inputs by these metadata names, in any order,
# and ignores the tensor names; our inputs are named like "serving_default_input_word_ids:0".
MEDIAPIPE_INPUT_NAMES = {"input_word_ids": "ids", "input_mask": "mask", "input_type_ids": "segment_ids"}
_INPUT_DESCRIPTIONS = {
    "input_word_ids": "Token ids: [CLS], the WordPiece ids of the text, [SEP], then [PAD] (0).",
    "input_mask": "1 for each real token, 0 for padding.",
    "input_type_ids": "Segment ids, all 0 (one sentence).",
}


def _schemas():
    # imported on first use: MediaPipe takes ~1 s to load, and an up-to-date compress stage writes no metadata
    from ai_edge_litert import schema_py_generated as tfl
    from mediapipe.tasks.metadata import metadata_schema_py_generated as md

    return tfl, md


def _input_keys(subgraph, name):
    """Our input name ("input_word_ids", ...) of each model input, in the model's input order."""
    keys = []
    for index in subgraph.inputs:
        tensor_name = subgraph.tensors[index].name.decode("utf-8")
        found = [k for k in MEDIAPIPE_INPUT_NAMES if k in tensor_name]
        if len(found) != 1:
            raise PipelineError(f"{name}: model input '{tensor_name}' is none of "
                                f"{', '.join(MEDIAPIPE_INPUT_NAMES)}")
        keys.append(found[0])
    if sorted(keys) != sorted(MEDIAPIPE_INPUT_NAMES):
        raise PipelineError(f"{name}: expected inputs {', '.join(MEDIAPIPE_INPUT_NAMES)}, found {', '.join(keys)}")
    return keys


def _model_metadata(md, input_keys, name, description):
    feature = lambda: md.ContentT(contentPropertiesType=md.ContentProperties.FeatureProperties,  # noqa: E731
                                  contentProperties=md.FeaturePropertiesT())
    vocab = md.AssociatedFileT(name=VOCAB_FILE, description="WordPiece vocabulary, one token per line.",
                               type=md.AssociatedFileType.VOCABULARY)
    labels = md.AssociatedFileT(name=LABELS_FILE, description="Class names, one per line, in output order.",
                                type=md.AssociatedFileType.TENSOR_AXIS_LABELS)
    inputs = [md.TensorMetadataT(name=MEDIAPIPE_INPUT_NAMES[k], description=f"{k}: {_INPUT_DESCRIPTIONS[k]}",
                                 content=feature()) for k in input_keys]
    output = md.TensorMetadataT(name="probability", description="Probabilities of the classes (softmax).",
                                content=feature(), stats=md.StatsT(max=[1.0], min=[0.0]), associatedFiles=[labels])
    # MediaPipe reads the tokenizer from the subgraph's first input process unit, not from a tensor's.
    tokenizer = md.ProcessUnitT(optionsType=md.ProcessUnitOptions.BertTokenizerOptions,
                                options=md.BertTokenizerOptionsT(vocabFile=[vocab]))
    subgraph = md.SubGraphMetadataT(inputTensorMetadata=inputs, outputTensorMetadata=[output],
                                    inputProcessUnits=[tokenizer])
    return md.ModelMetadataT(name=name, description=description, subgraphMetadata=[subgraph],
                             minParserVersion=MIN_PARSER_VERSION)


def _pack(obj, identifier):
    builder = flatbuffers.Builder(1024)
    builder.Finish(obj.Pack(builder), file_identifier=identifier)
    return bytes(builder.Output())


def add_metadata(model_content: bytes, vocab_path, labels_path, name: str, description: str) -> bytes:
    """The .tflite bytes with MediaPipe text-classifier metadata and vocab.txt/labels.txt packed in."""
    tfl, md = _schemas()
    # Unpacking parses the flatbuffer only, so a zip already appended (earlier metadata) is dropped.
    model = tfl.ModelT.InitFromPackedBuf(bytearray(model_content), 0)
    if len(model.subgraphs) != 1:
        raise PipelineError(f"{name}: MediaPipe text models must have one subgraph, found {len(model.subgraphs)}")
    meta = _pack(_model_metadata(md, _input_keys(model.subgraphs[0], name), name, description), b"M001")
    buffer = tfl.BufferT(data=np.frombuffer(meta, np.uint8))
    model.metadata = model.metadata or []  # the converter's own entries (runtime version...) stay
    entry = _metadata_entry(model)
    if entry is None:
        model.buffers.append(buffer)
        model.metadata.append(tfl.MetadataT(name=METADATA_NAME, buffer=len(model.buffers) - 1))
    else:  # metadata added before: replace it in place
        model.buffers[entry.buffer] = buffer

    out = io.BytesIO(_pack(model, b"TFL3"))
    out.seek(0, io.SEEK_END)
    # Mode "a" on bytes that are not a zip appends a new archive whose offsets count from the start
    # of the whole file, the layout MediaPipe's zip reader expects. ZIP_STORED: files are read in place.
    # A fixed timestamp: the same model and files give the same bytes (a resumed run is reproducible).
    with zipfile.ZipFile(out, "a", zipfile.ZIP_STORED) as z:
        for name, path in ((VOCAB_FILE, vocab_path), (LABELS_FILE, labels_path)):
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), Path(path).read_bytes())
    return out.getvalue()


def _metadata_entry(model):
    return next((m for m in model.metadata or [] if m.name.decode("utf-8") == METADATA_NAME), None)


def read_metadata(model_content: bytes) -> dict:
    """{"name", "description", "inputs", "output", "associated_files", "files"} of a model's metadata
    ("files": the names in the appended zip)."""
    tfl, md = _schemas()
    model = tfl.ModelT.InitFromPackedBuf(bytearray(model_content), 0)
    entry = _metadata_entry(model)
    if entry is None:
        raise PipelineError(f"no {METADATA_NAME} in the model")
    meta = md.ModelMetadataT.InitFromPackedBuf(bytearray(model.buffers[entry.buffer].data.tobytes()), 0)
    subgraph, output = meta.subgraphMetadata[0], meta.subgraphMetadata[0].outputTensorMetadata[0]
    vocab_files = [f for u in subgraph.inputProcessUnits or [] for f in u.options.vocabFile]
    data = io.BytesIO(model_content)
    return {
        "name": meta.name.decode("utf-8"), "description": meta.description.decode("utf-8"),
        "inputs": [t.name.decode("utf-8") for t in subgraph.inputTensorMetadata],
        "output": output.name.decode("utf-8"),
        "associated_files": [f.name.decode("utf-8") for f in vocab_files + (output.associatedFiles or [])],
        "files": zipfile.ZipFile(data).namelist() if zipfile.is_zipfile(data) else [],
    }
