// Which of cuBLASLt's candidate algorithms an LtGemm plan runs: timed once, then recorded.
// (Host code only; ltgemm_kernel.cuh times the candidates and asks this record first.)
//
// cuBLASLt's heuristic returns up to kLtCandidates algorithms for a plan, its best guess first. At
// most of the step graphs' shapes the guess is within 1 % of the fastest, at some it is 7-14 %
// slower (benchmarks/results/h200-2026-12-02h.md: the DiT's down-projection, the U-Net skip
// projections, the vocoder's wide branch). So the first call of a plan that has no recorded choice
// times every candidate as a step graph runs it (ltgemm_kernel.cuh's LtTimer: kLtTuneCalls calls
// replayed from a CUDA graph, weights cold, the best of kLtTuneRounds replays) and keeps the
// fastest, unless that beats the first guess by less than kLtTuneMargin: a choice that timing
// noise could flip is not worth a different rounding. (Timed with plain launches and hot weights,
// the choices made the DiT step slower: host launch cost and L2 hits decided them.)
//
// A choice is the candidate's rank in the heuristic's list, which is the same list for the same
// cuBLASLt, device and plan. It is recorded under a key naming all three (a line "key<TAB>rank")
// in the text file $SEMVOC_LTGEMM_ALGORITHMS, which semvoc's runtime points at the engine's
// gemm_algorithms.txt. A later process takes the recorded rank without timing anything: the same
// algorithms, so the same seed gives the same bits, and no timing on start. Without the variable,
// choices are timed once per process and kept in memory. $SEMVOC_LTGEMM_TUNE=0: the heuristic's
// first guess, untimed and unrecorded (every choice the same as before this record existed), as
// for plans over kLtTuneMaxGflop.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <string>

namespace semvoc {

constexpr int kLtCandidates = 8;        // what cuBLASLt 13's heuristic gives for these shapes at most
constexpr int kLtTuneCalls = 20;        // calls per timed CUDA graph
constexpr int kLtTuneRounds = 5;        // replays per candidate; the fastest counts
constexpr float kLtTuneMargin = 0.03f;  // a candidate must beat the first guess by this fraction
// Larger plans keep the heuristic's first guess, untimed. At batch 16 (the DiT's M = 8,000: 17-67
// GFLOP per GEMM) the GEMMs run near the card's rate, and the timed choices made the DiT step 1.4 %
// slower on an H200; at batch 1 (0.5-8.4 GFLOP) they made it 3.4 % faster and the vocoder step 2 %
// (benchmarks/results/h200-2026-12-03.md).
constexpr double kLtTuneMaxGflop = 12.0;

// Whether a plan of m x n x k times its candidates.
inline bool LtTuningEnabled(int64_t m, int64_t n, int64_t k) {
  const char* value = std::getenv("SEMVOC_LTGEMM_TUNE");
  const bool enabled = value == nullptr || std::string(value) != "0";
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  return enabled && flops <= kLtTuneMaxGflop * 1e9;
}

// The process's choices, from and to $SEMVOC_LTGEMM_ALGORITHMS.
class LtChoices {
 public:
  static LtChoices& Get() {
    static LtChoices* choices = new LtChoices;  // never destroyed: nodes may outlive static destruction
    return *choices;
  }

  // The recorded rank for `key`, or -1.
  int Find(const std::string& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    Load();
    const auto found = ranks_.find(key);
    return found == ranks_.end() ? -1 : found->second;
  }

  // Records `rank` for `key` and rewrites the file (a temporary file, then a rename): choices that
  // another process wrote meanwhile are kept, this process's own win where both chose.
  void Record(const std::string& key, int rank) {
    std::lock_guard<std::mutex> lock(mutex_);
    Load();
    ranks_[key] = rank;
    if (path_.empty()) return;
    std::map<std::string, int> merged = Read(path_);
    for (const auto& [k, r] : ranks_) merged[k] = r;
    const std::string temporary = path_ + ".tmp." + std::to_string(getpid());
    bool written = false;
    {
      std::ofstream out(temporary, std::ios::trunc);
      out << "# semvoc LtGemm: cuBLASLt algorithm choices (key: device, cuBLASLt version, type, M N K lda ldo, "
             "epilogue, alignment; value: the rank in cuBLASLt's heuristic list).\n"
             "# Delete this file to time them again.\n";
      for (const auto& [k, r] : merged) out << k << '\t' << r << '\n';
      out.flush();
      written = static_cast<bool>(out);
    }
    if (written && std::rename(temporary.c_str(), path_.c_str()) == 0) return;
    std::remove(temporary.c_str());
    if (!warned_) {  // the choices still hold in this process
      warned_ = true;
      std::fprintf(stderr, "semvoc.cuda LtGemm: cannot write %s: GEMM algorithm choices are kept for this process "
                   "only (point SEMVOC_LTGEMM_ALGORITHMS at a writable file)\n", path_.c_str());
    }
  }

  // Held while a plan times its candidates: two timings at once would disturb each other.
  std::mutex& timing() { return timing_; }

 private:
  static std::map<std::string, int> Read(const std::string& path) {
    std::map<std::string, int> ranks;
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      const size_t tab = line.rfind('\t');
      if (line.empty() || line[0] == '#' || tab == std::string::npos) continue;
      const int rank = std::atoi(line.c_str() + tab + 1);
      if (rank >= 0 && rank < kLtCandidates) ranks[line.substr(0, tab)] = rank;
    }
    return ranks;
  }

  // Reads $SEMVOC_LTGEMM_ALGORITHMS the first time it names a file; a choice this process already
  // holds is kept.
  void Load() {
    const char* path = std::getenv("SEMVOC_LTGEMM_ALGORITHMS");
    path_ = path != nullptr ? path : "";
    if (path_.empty() || !loaded_.insert(path_).second) return;
    for (const auto& [k, r] : Read(path_)) ranks_.emplace(k, r);
  }

  std::mutex mutex_, timing_;
  std::string path_;
  std::set<std::string> loaded_;
  std::map<std::string, int> ranks_;
  bool warned_ = false;
};

}  // namespace semvoc
