# Per-source CUDA arch flags (the vLLM approach): torch's global -gencode flags are removed and
# each Hopper source gets an explicit sm_90a gencode, so WGMMA/TMA code never meets a generic arch.
string(REGEX REPLACE "-gencode[ =]arch=compute_[0-9a-z]+,code=[a-z_0-9]+" "" CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
string(APPEND CMAKE_CUDA_FLAGS " -DNDEBUG -diag-suppress 2908 --expt-relaxed-constexpr --expt-extended-lambda")

# CUTLASS/CuTe headers from the pinned nvidia-cutlass wheel (never fetched during the build).
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "import importlib.util as u, os; s=u.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source', 'include') if s else '')"
  OUTPUT_VARIABLE GLM5_CUTLASS_INCLUDE OUTPUT_STRIP_TRAILING_WHITESPACE)

# Development kill-switch: leave out the CUTLASS grouped-GEMM TUs (~80 s and ~4.5 GB each to compile);
# bf16 grouped GEMMs then take the portable SIMT kernel.
option(GLM5_DISABLE_CUTLASS_GROUPED_GEMM "Build the MoE grouped GEMM without CUTLASS" OFF)
if(GLM5_DISABLE_CUTLASS_GROUPED_GEMM)
  add_compile_definitions(GLM5_DISABLE_CUTLASS_GROUPED_GEMM)
endif()

function(glm5_set_cuda_arch_flags SRCS ARCHS)
  set(_flags "")
  foreach(_arch ${ARCHS})
    string(REPLACE "." "" _sm "${_arch}")          # 9.0a -> 90a
    list(APPEND _flags "-gencode=arch=compute_${_sm},code=sm_${_sm}")
  endforeach()
  foreach(_src ${SRCS})
    set_source_files_properties(${_src} PROPERTIES COMPILE_OPTIONS "${_flags}")
  endforeach()
endfunction()
