# Find the torch of the running Python and decide whether the CUDA sources are built.
# PREPEND (not APPEND) so an isolated build never picks up another torch on the system.
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "import torch; print(torch.utils.cmake_prefix_path); print(int(torch.version.cuda is not None))"
  OUTPUT_VARIABLE _glm5_torch_out OUTPUT_STRIP_TRAILING_WHITESPACE
  COMMAND_ERROR_IS_FATAL ANY)
string(REPLACE "\n" ";" _glm5_torch_out "${_glm5_torch_out}")
list(GET _glm5_torch_out 0 _glm5_torch_prefix)
list(GET _glm5_torch_out 1 _glm5_torch_has_cuda)
list(PREPEND CMAKE_PREFIX_PATH "${_glm5_torch_prefix}")

# The decision depends on the toolkit and on torch being a CUDA build, never on a GPU being present.
set(GLM5_BUILD_CUDA OFF)
if(NOT GLM5_ENABLE_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER)
    # Prefer CUDA_HOME; otherwise the first `nvcc` on PATH, which may be a wrapper script
    # (`exec /usr/local/cuda-X/bin/nvcc "$@"`): torch's CUDA discovery needs the real binary.
    if(DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
      set(_glm5_nvcc "$ENV{CUDA_HOME}/bin/nvcc")
    else()
      find_program(_glm5_nvcc nvcc)
    endif()
    if(_glm5_nvcc)
      file(READ "${_glm5_nvcc}" _glm5_head LIMIT 512)
      if(_glm5_head MATCHES "^#!" AND _glm5_head MATCHES "exec[ \t]+\"?([^ \t\"]+/bin/nvcc)")
        set(_glm5_nvcc "${CMAKE_MATCH_1}")
      endif()
      get_filename_component(_glm5_nvcc "${_glm5_nvcc}" REALPATH)
      set(CMAKE_CUDA_COMPILER "${_glm5_nvcc}")
      get_filename_component(_glm5_cuda_root "${_glm5_nvcc}" DIRECTORY)
      get_filename_component(CUDA_TOOLKIT_ROOT_DIR "${_glm5_cuda_root}" DIRECTORY)
    endif()
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER AND _glm5_torch_has_cuda)
    set(GLM5_BUILD_CUDA ON)
  elseif(GLM5_ENABLE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "GLM5_ENABLE_CUDA=ON but nvcc (${CMAKE_CUDA_COMPILER}) or a CUDA build of torch is missing")
  endif()
endif()

if(GLM5_BUILD_CUDA)
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 20)
  # torch's CMake reads TORCH_CUDA_ARCH_LIST, not CMAKE_CUDA_ARCHITECTURES; per-source flags are
  # added by glm5_set_cuda_arch_flags, so give torch the same list to keep its checks quiet.
  set(ENV{TORCH_CUDA_ARCH_LIST} "${GLM5_CUDA_ARCHS}")
  # A bare toolkit may lack libraries and headers that torch's CMake and ATen's CUDA headers expect
  # (nvrtc, cuBLAS, cuSPARSE, ...): the CUDA torch's own nvidia-* wheels carry them.
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c "import nvidia, os; print(next((os.path.join(p, d) for p in nvidia.__path__ for d in sorted(os.listdir(p)) if d.startswith('cu') and d[2:].isdigit()), ''))"
    OUTPUT_VARIABLE GLM5_NVIDIA_WHEEL_DIR OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(GLM5_NVIDIA_WHEEL_DIR)
    set(GLM5_CUDA_EXTRA_INCLUDES "${GLM5_NVIDIA_WHEEL_DIR}/include")
    file(GLOB _glm5_nvrtc "${GLM5_NVIDIA_WHEEL_DIR}/lib/libnvrtc.so.[0-9]*")
    if(_glm5_nvrtc AND NOT EXISTS "${CUDA_TOOLKIT_ROOT_DIR}/lib64/libnvrtc.so")
      list(GET _glm5_nvrtc 0 _glm5_nvrtc)
      set(CUDA_nvrtc_LIBRARY "${_glm5_nvrtc}" CACHE FILEPATH "nvrtc from the CUDA torch's wheels")
      set(CUDA_NVRTC_LIB "${_glm5_nvrtc}" CACHE FILEPATH "nvrtc from the CUDA torch's wheels")
    endif()
  endif()
  find_package(CUDAToolkit REQUIRED)
endif()
find_package(Torch REQUIRED)
message(STATUS "glm5: torch at ${_glm5_torch_prefix}; CUDA kernels: ${GLM5_BUILD_CUDA}")
