"""Deep Compression and Dynamic Network Surgery: make the stored model small.

Deep Compression (Han, Mao & Dally, ICLR 2016) chains three stages, each usable alone:

1. pruning: :func:`torchslim.sparsity.sparsify_` (magnitude, per layer or global), or
   :class:`NetworkSurgery` (Guo, Yao & Chen, NeurIPS 2016: prune *and splice* during training);
2. weight sharing: :func:`share_weights_` clusters each layer's non-zero weights by k-means;
   fine-tuning trains the centroids (the gradients of a cluster's weights are summed into it);
3. Huffman coding: :func:`save_compressed` writes the cluster indices and the relative sparse
   positions with canonical Huffman codes (built with the ``bitarray`` library), and
   :func:`load_compressed` rebuilds the weights bit-exactly.

This shrinks the file, not the computation: the loaded model is an ordinary dense model, as
fast as the original on dense kernels.
"""
from torchslim.compress.fileformat import (FILE_NAME, CompressedFileError, compression_report, load_compressed,
                                           save_compressed)
from torchslim.compress.huffman import (HuffmanStream, RelativeIndex, absolute_positions, huffman_decode,
                                        huffman_encode, relative_index)
from torchslim.compress.kmeans import kmeans_1d
from torchslim.compress.report import CompressionReport, LayerBits
from torchslim.compress.sharing import (SharedLayer, WeightSharing, is_shared, remove_sharing_, restore_sharing_,
                                        share_weights_, sharing_of)
from torchslim.compress.surgery import NetworkSurgery, SurgeryLayer

__all__ = ["FILE_NAME", "CompressedFileError", "CompressionReport", "HuffmanStream", "LayerBits", "NetworkSurgery", "RelativeIndex", "SharedLayer",
           "SurgeryLayer",
           "WeightSharing", "absolute_positions", "compression_report", "huffman_decode", "huffman_encode",
           "is_shared", "kmeans_1d", "load_compressed", "relative_index", "remove_sharing_", "restore_sharing_",
           "save_compressed", "share_weights_", "sharing_of"]
