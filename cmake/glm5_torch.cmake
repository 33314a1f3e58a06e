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
    # The first `nvcc` on PATH may be a wrapper script; torch's CUDA discovery needs the real one.
    find_program(_glm5_nvcc nvcc)
    if(_glm5_nvcc)
      get_filename_component(_glm5_nvcc_real "${_glm5_nvcc}" REALPATH)
      if(EXISTS "/usr/local/cuda/bin/nvcc" AND NOT _glm5_nvcc_real MATCHES "/bin/nvcc$")
        set(_glm5_nvcc_real "/usr/local/cuda/bin/nvcc")
      endif()
      set(CMAKE_CUDA_COMPILER "${_glm5_nvcc_real}")
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
  find_package(CUDAToolkit REQUIRED)
endif()
find_package(Torch REQUIRED)
message(STATUS "glm5: torch at ${_glm5_torch_prefix}; CUDA kernels: ${GLM5_BUILD_CUDA}")
