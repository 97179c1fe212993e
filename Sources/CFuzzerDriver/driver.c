// Declarations only (include/CFuzzerDriver.h); a C target needs a source file.
#include "CFuzzerDriver.h"
