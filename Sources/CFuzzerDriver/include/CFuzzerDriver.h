#ifndef C_FUZZER_DRIVER_H
#define C_FUZZER_DRIVER_H

#include <stddef.h>
#include <stdint.h>

/// libFuzzer's driver, linked only into a fuzz build (-sanitize=fuzzer): holdfast-fuzz calls it
/// from its own main, because SwiftPM renames an executable's main and libFuzzer's cannot be used.
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));

#endif
