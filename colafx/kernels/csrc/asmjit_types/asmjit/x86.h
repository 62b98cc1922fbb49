#pragma once
#include "core.h"  // the type-only stand-in (see core.h)
