"""Run at interpreter start by vp_gguf_libs.pth (installed beside vp_gguf).

llama-cpp-python's ctypes layer loads libllama/libmtmd from the folders named
by LLAMA_CPP_LIB_PATH and MTMD_CPP_LIB. Pointing both at vp_gguf/lib makes a
plain ``import llama_cpp`` use our patched build, whether or not vp_gguf was
imported first. A value the user set is left alone.
"""

import os

LIB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vp_gguf", "lib")
if os.path.isdir(LIB_DIR):
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", LIB_DIR)
    os.environ.setdefault("MTMD_CPP_LIB", LIB_DIR)
