#define KFAC_EXPERIMENTAL_API 1
#define KFAC_BUILDING_LIBRARY 1
#include "../../include/kfac.h"
